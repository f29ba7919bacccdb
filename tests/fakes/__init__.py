"""Test doubles that speak real protocols on loopback (no mocking of what a test checks)."""
