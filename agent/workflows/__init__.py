"""Workflows: a deployment's role turns the battery view into lifecycle event drafts."""
