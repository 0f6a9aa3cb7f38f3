"""Tests of bigbatch.core."""
