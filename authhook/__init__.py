"""authhook: an authorization back end (policy decision point) for MQTT brokers, and a library.

In-process use: see the README's "Library use", a complete program that the test suite runs as written.
Everything a service needs is importable from here: the PDP and its requests and answers, the entity models
the store's ``put_*`` methods take, world files, settings and the errors.
"""

from authhook.cache import DecisionCache
from authhook.config import Settings, load_settings
from authhook.decision_log import DecisionLog
from authhook.errors import (
    AuthhookError,
    ConfigError,
    Conflict,
    EvaluatorError,
    EvaluatorUnavailable,
    InvalidInput,
    NotFound,
    StoreError,
    StoreUnavailable,
)
from authhook.evaluators import InHouseEvaluator, PolicyEvaluator
from authhook.models import Action, AuthzRequest, Decision, Reason, Subject, Target, Verdict
from authhook.pdp import PDP, Explanation, make_request, open_pdp
from authhook.store import Store, create_store
from authhook.store.base import (
    AssigneeKind,
    Assignment,
    Block,
    Channel,
    Connection,
    Effect,
    Group,
    GroupKind,
    Role,
    ScopeKind,
    SubjectKind,
    SubjectRecord,
    Tenant,
)
from authhook.topics import TopicTemplate
from authhook.world import World, import_world, load_world

__all__ = [
    "PDP",
    "Action",
    "AssigneeKind",
    "Assignment",
    "AuthhookError",
    "AuthzRequest",
    "Block",
    "Channel",
    "ConfigError",
    "Conflict",
    "Connection",
    "Decision",
    "DecisionCache",
    "DecisionLog",
    "Effect",
    "EvaluatorError",
    "EvaluatorUnavailable",
    "Explanation",
    "Group",
    "GroupKind",
    "InHouseEvaluator",
    "InvalidInput",
    "NotFound",
    "PolicyEvaluator",
    "Reason",
    "Role",
    "ScopeKind",
    "Settings",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Subject",
    "SubjectKind",
    "SubjectRecord",
    "Target",
    "Tenant",
    "TopicTemplate",
    "Verdict",
    "World",
    "create_store",
    "import_world",
    "load_settings",
    "load_world",
    "make_request",
    "open_pdp",
]
