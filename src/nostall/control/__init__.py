"""Policies the engine applies: worker supervision and tuning while the loop runs."""
