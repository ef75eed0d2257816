"""Errors as values with stable codes.

    AuthhookError (code)
    ├── ConfigError            config_error
    ├── InvalidInput           invalid_input       bad entity data from the CLI, an import file or the API
    ├── StoreError             store_error
    │   ├── StoreUnavailable   store_unavailable   the database cannot be reached or timed out
    │   ├── NotFound           not_found
    │   └── Conflict           conflict            duplicate id, or a reference across tenants
    └── EvaluatorError         evaluator_error
        └── EvaluatorUnavailable  evaluator_unavailable

Messages are one lowercase line with user values in backticks; the cause stays chained for logs only.
The decision point turns any of these into a deny carrying the code, so none reaches a broker adapter.
"""

from __future__ import annotations


class AuthhookError(Exception):
    code = "authhook_error"


class ConfigError(AuthhookError):
    code = "config_error"


class InvalidInput(AuthhookError):
    code = "invalid_input"


class StoreError(AuthhookError):
    code = "store_error"


class StoreUnavailable(StoreError):
    code = "store_unavailable"


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"


class EvaluatorError(AuthhookError):
    code = "evaluator_error"


class EvaluatorUnavailable(EvaluatorError):
    code = "evaluator_unavailable"
