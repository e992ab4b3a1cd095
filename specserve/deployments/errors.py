"""Errors of the control plane; each message says which rule was broken and how to fix it.

They subclass ValueError so a caller that only knows "the user's input was wrong"
(`specserve.cli.main`) reports them like any other bad flag.
"""

from __future__ import annotations


class DeploymentError(ValueError):
    """A deployment request breaks a rule (flags, id, vocabulary) or names a missing record."""


class DeploymentNotFoundError(DeploymentError, LookupError):
    """No deployment has the requested id; the message lists the ids that exist."""


class DeploymentExistsError(DeploymentError):
    """A deployment with the requested id already exists."""


class StoreVersionError(DeploymentError):
    """The database was written by a newer specserve whose schema this one does not know."""
