"""authhook: an authorization back end (policy decision point) for MQTT brokers, and a library.

In-process use::

    from authhook import open_pdp, make_request

    pdp = await open_pdp(store_url="sqlite:///authhook.db")
    decision = await pdp.authorize(make_request("publish", "dev-1", "m/acme/c/telemetry/temp"))
    print(decision.allowed, decision.reason)
    await pdp.close()
"""

from authhook.cache import DecisionCache
from authhook.config import Settings, load_settings
from authhook.decision_log import DecisionLog
from authhook.errors import AuthhookError, Conflict, InvalidInput, NotFound, StoreUnavailable
from authhook.evaluators import InHouseEvaluator, PolicyEvaluator
from authhook.models import Action, AuthzRequest, Decision, Reason, Subject, Target, Verdict
from authhook.pdp import PDP, Explanation, make_request, open_pdp
from authhook.store import Store, create_store
from authhook.topics import TopicTemplate

__all__ = [
    "PDP",
    "Action",
    "AuthhookError",
    "AuthzRequest",
    "Conflict",
    "Decision",
    "DecisionCache",
    "DecisionLog",
    "Explanation",
    "InHouseEvaluator",
    "InvalidInput",
    "NotFound",
    "PolicyEvaluator",
    "Reason",
    "Settings",
    "Store",
    "StoreUnavailable",
    "Subject",
    "Target",
    "TopicTemplate",
    "Verdict",
    "create_store",
    "load_settings",
    "make_request",
    "open_pdp",
]
