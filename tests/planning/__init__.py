"""Tests of the planning base (plan, batch units)."""
