"""Unit tests: no engine, no agent processes, no network servers (`pytest tests/unit`)."""
