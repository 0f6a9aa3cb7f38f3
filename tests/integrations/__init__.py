"""Tests of bigbatch.integrations."""
