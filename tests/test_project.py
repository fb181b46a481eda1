"""The two-line start: `aiam init` writes a project, `agentic_iam.load` guards calls with it.

Everything runs on real files in a temporary folder: the generated registry, the generated and
validated Cedar policies, real keys, the JSONL audit log and (where a shared store is tested) a
real SQLite file.
"""

from __future__ import annotations

import copy
import json
import pickle
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agentic_iam import (
    CedarEngine,
    ConfigurationError,
    Delegation,
    DelegationError,
    ExecutionToken,
    Human,
    KeySet,
    PolicyLoadError,
    Project,
    StoreStateLostError,
    ToolCall,
    Workload,
    current_token,
    default_policies_dir,
    init_project,
    load,
    verify_log,
)
from agentic_iam.cli import app
from agentic_iam.core.registry import AgentRegistry
from agentic_iam.project import _adapter_module, read_config

REFUND_CAPS = ["refund:create amount<=100 currency=USD", "ticket:read"]


def refund(amount: int, account: str = "ACC-1001") -> ToolCall:
    return ToolCall("create_refund", {"amount": amount, "currency": "USD", "account": account})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "proj"
    init_project(target)
    return target


@pytest.fixture
def iam(folder: Path) -> Iterator[Project]:
    with load(folder) as project:
        yield project


def events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "aiam-audit.jsonl").read_text().splitlines()]


# --- init -> load -> delegate -> authorize ---------------------------------------------------


def test_init_load_delegate_authorize_end_to_end(iam: Project, folder: Path) -> None:
    with iam.delegate("alice@example.com", "refund T-1042", REFUND_CAPS) as token:
        allowed = iam.guard.authorize(token, refund(50))
        assert allowed.outcome == "allow", allowed.reasons
        iam.guard.complete(allowed)
        over_grant = iam.guard.authorize(token, refund(500))
        assert over_grant.outcome == "deny"
        assert "amount" in over_grant.reasons[0].message
        unknown = iam.guard.authorize(token, ToolCall("delete_account", {"account": "A"}))
        assert unknown.outcome == "deny"
    with iam.delegate("alice@example.com", "shipping fee", ["refund:create amount<=200"]) as fee:
        needs_human = iam.guard.authorize(fee, refund(150))
        assert needs_human.outcome == "approval_required"
        assert needs_human.reasons[0].policy_id == "app.refund-over-100"
        external = iam.guard.authorize(fee, ToolCall(
            "send_email", {"to": "x@evil.test", "subject": "s", "body": "b"}))
        assert external.outcome == "deny"  # email:send was not delegated
    recorded = events(folder)
    kinds = [e["event_type"] for e in recorded]
    assert kinds.count("delegation.minted") == 2
    assert kinds.count("execution.ended") == 2
    decided = [e["decision"]["outcome"] for e in recorded if e["event_type"] == "tool_call.decided"]
    assert decided == ["allow", "deny", "deny", "approval_required", "deny"]
    iam.close()
    keys = KeySet.load(folder / "aiam-keys.json")
    report = verify_log(folder / "aiam-audit.jsonl", public_keys=keys.public_keys())
    assert report.ok and report.intact, report


def test_the_delegate_block_binds_the_token_and_ends_the_execution(iam: Project,
                                                                   folder: Path) -> None:
    assert current_token() is None
    with iam.delegate("alice@example.com", "refund T-1042", REFUND_CAPS) as token:
        bound = current_token()
        assert isinstance(bound, ExecutionToken) and not isinstance(bound, Delegation)
        assert bound.token == token.token
        assert iam.guard.authorize(token, refund(20)).outcome == "allow"
    assert current_token() is None
    assert token.ended
    after = iam.guard.authorize(token, refund(20))
    assert after.outcome == "deny"
    assert after.reasons[0].code == "token.revoked"
    ended = [e for e in events(folder) if e["event_type"] == "execution.ended"]
    assert len(ended) == 1 and ended[0]["extra"]["reason"] == "completed"
    assert ended[0]["execution_id"] == token.identity.execution_id


def test_an_exception_in_the_block_still_ends_the_execution(iam: Project, folder: Path) -> None:
    with pytest.raises(ValueError, match="tool blew up"), \
            iam.delegate("alice@example.com", "refund", REFUND_CAPS) as token:
        raise ValueError("tool blew up")
    assert current_token() is None
    assert iam.guard.authorize(token, refund(20)).reasons[0].code == "token.revoked"
    ended = [e for e in events(folder) if e["event_type"] == "execution.ended"]
    assert [e["extra"]["reason"] for e in ended] == ["failed: ValueError"]


async def test_async_with_binds_the_token_for_awaited_work(iam: Project) -> None:
    import asyncio

    async def tool_step() -> object:
        await asyncio.sleep(0)
        return current_token()

    async with iam.delegate("alice@example.com", "refund", REFUND_CAPS) as token:
        seen = await asyncio.gather(tool_step(), asyncio.create_task(tool_step()))
    assert all(isinstance(t, ExecutionToken) and t.token == token.token for t in seen)
    assert current_token() is None and token.ended
    assert iam.guard.authorize(token, refund(10)).reasons[0].code == "token.revoked"


def test_the_guards_own_approver_comes_from_load(folder: Path) -> None:
    from agentic_iam import CallbackApprover

    asked: list[str] = []

    def bob(request: Any) -> bool:
        asked.append(request.tool)
        return True

    with load(folder, approver=CallbackApprover(bob, name="you@example.com")) as project, \
            project.delegate("alice@example.com", "fee", ["refund:create amount<=200"]) as token:
        decision = project.guard.authorize(token, refund(150))
        assert decision.outcome == "allow", decision.reasons
        project.guard.complete(decision)
    assert asked == ["create_refund"]
    granted = [e for e in events(folder) if e["event_type"] == "approval.granted"]
    assert len(granted) == 1 and granted[0]["extra"]["approver"] == "you@example.com"


def test_a_plain_call_returns_the_token_and_end_ends_it(iam: Project) -> None:
    token = iam.delegate(Human("bob@example.com", issuer="https://idp.example.com"), "refund",
                         REFUND_CAPS, ttl="5m", budget={"tool_calls": 2})
    assert isinstance(token, ExecutionToken)
    assert token.identity.delegator_id == "bob@example.com"
    assert token.identity.expires_at - token.identity.issued_at == 300
    assert current_token() is None  # a plain call binds nothing
    assert iam.guard.authorize(token, refund(10)).outcome == "allow"
    token.end()
    token.end()  # idempotent
    assert iam.guard.authorize(token, refund(10)).reasons[0].code == "token.revoked"
    with pytest.raises(ConfigurationError, match="has ended"), token:
        pass


def test_a_delegation_cannot_be_bound_twice_at_once(iam: Project) -> None:
    token = iam.delegate("alice@example.com", "refund", REFUND_CAPS)
    with token, pytest.raises(ConfigurationError, match="already bound"), token:
        pass
    assert token.ended


def test_a_failure_to_end_is_raised_and_can_be_retried(iam: Project,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from agentic_iam import StoreUnavailableError

    real = iam.guard.end_execution

    def store_down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailableError("store down")

    monkeypatch.setattr(iam.guard, "end_execution", store_down)
    with pytest.raises(StoreUnavailableError), \
            iam.delegate("alice@example.com", "refund", REFUND_CAPS) as token:
        pass
    assert not token.ended and current_token() is None
    assert iam.guard.authorize(token, refund(10)).outcome == "allow"  # still alive: said loudly
    monkeypatch.setattr(iam.guard, "end_execution", real)
    token.end()
    assert token.ended
    assert iam.guard.authorize(token, refund(10)).reasons[0].code == "token.revoked"


def test_copies_of_a_delegation_are_plain_tokens(iam: Project) -> None:
    token = iam.delegate(Workload("nightly-job"), "refund", REFUND_CAPS)
    for clone in (copy.copy(token), copy.deepcopy(token), pickle.loads(pickle.dumps(token))):
        assert type(clone) is ExecutionToken
        assert clone.token == token.token and clone.identity == token.identity
    assert "eyJ" not in repr(token)  # the compact JWS stays out of repr
    token.end()


def test_an_execution_an_adapter_already_ended_is_not_ended_twice(iam: Project,
                                                                  folder: Path) -> None:
    with iam.delegate("alice@example.com", "refund", REFUND_CAPS) as token:
        iam.guard.end_execution(token, reason="final output")  # what an adapter does
    ended = [e["extra"]["reason"] for e in events(folder) if e["event_type"] == "execution.ended"]
    assert ended == ["final output"]


def test_delegate_grants_memory_scopes_within_the_registry(iam: Project) -> None:
    documents = [("faq", "kb:public"), ("ticket", "support"), ("payroll", "hr")]
    with iam.delegate("alice@example.com", "answer", ["kb:search"]) as everything:
        assert everything.identity.memory_scopes == frozenset({"support", "kb:public"})
    with iam.delegate("alice@example.com", "answer", ["kb:search"],
                      memory_scopes=["kb:public"]) as narrow:
        read = iam.guard.filter_memory(narrow, documents, scope_of=lambda d: d[1],
                                       id_of=lambda d: d[0], query="refunds")
        assert [d[0] for d in read.kept] == ["faq"]
        assert {(d.id, d.scope) for d in read.dropped} == {("ticket", "support"),
                                                           ("payroll", "hr")}
    after = iam.guard.filter_memory(narrow, documents, scope_of=lambda d: d[1],
                                    id_of=lambda d: d[0])
    assert after.kept == () and after.reason  # an ended run reads nothing
    with pytest.raises(DelegationError, match="hr"):
        iam.delegate("alice@example.com", "answer", ["kb:search"], memory_scopes=["hr"])


def test_delegate_refuses_what_the_registry_does_not_allow(iam: Project) -> None:
    with pytest.raises(DelegationError, match="account:delete"):
        iam.delegate("alice@example.com", "close it", ["account:delete"])
    with pytest.raises(ConfigurationError, match="unknown agent `nobody`"):
        iam.delegate("alice@example.com", "x", REFUND_CAPS, agent="nobody")
    with pytest.raises(ConfigurationError, match="user id, a Human or a Workload"):
        iam.delegate(42, "x", REFUND_CAPS)  # type: ignore[arg-type]


def test_delegate_and_protect_need_an_agent_id_when_there_are_several(folder: Path) -> None:
    registry = yaml.safe_load((folder / "agents.yaml").read_text())
    second = dict(registry["agents"][0], id="second-agent")
    registry["agents"].append(second)
    (folder / "agents.yaml").write_text(yaml.safe_dump(registry))
    (folder / "aiam.yaml").write_text((folder / "aiam.yaml").read_text().replace(
        "schema: policies/schema.json", ""))  # the schema is generated at load
    with load(folder) as project:
        with pytest.raises(ConfigurationError, match="needs `agent_id`: the registry has 2"):
            project.delegate("alice@example.com", "x", REFUND_CAPS)
        token = project.delegate("alice@example.com", "x", REFUND_CAPS, agent="second-agent")
        assert token.identity.agent_id == "second-agent"
        token.end()


# --- init ------------------------------------------------------------------------------------


def test_init_writes_a_project_whose_keys_only_the_owner_reads(folder: Path) -> None:
    mode = stat.S_IMODE((folder / "aiam-keys.json").stat().st_mode)
    assert mode == 0o600
    for name in ("aiam.yaml", "agents.yaml", "policies/schema.json", ".gitignore",
                 "policies/baseline/baseline.cedar", "policies/app/app.cedar"):
        assert (folder / name).is_file(), name
    assert list((folder / "policies/app/ALLOW").glob("*.json"))
    assert list((folder / "policies/app/DENY").glob("*.json"))
    assert "aiam-keys.json" in (folder / ".gitignore").read_text()
    registry = AgentRegistry.from_yaml(folder / "agents.yaml")
    assert [a.id for a in registry.list_agents()] == ["support-agent"]
    assert registry.get("support-agent").memory_scopes  # type: ignore[union-attr]
    from agentic_iam.core.policy.cedar import generate_schema

    schema = json.loads((folder / "policies/schema.json").read_text())
    assert schema == generate_schema(registry)
    config = read_config(folder)
    assert config.store == "memory" and config.audit == (folder / "aiam-audit.jsonl").resolve()
    assert config.approvers == frozenset({"you@example.com"})
    assert config.guard.approvers == config.approvers


def test_init_refuses_a_folder_that_is_not_empty_unless_forced(folder: Path) -> None:
    before = KeySet.load(folder / "aiam-keys.json").active.kid
    (folder / ".gitignore").write_text("mine\n")
    with pytest.raises(ConfigurationError, match="is not empty"):
        init_project(folder)
    (folder / "agents.yaml").write_text("broken: [")
    done = init_project(folder, force=True)
    assert Path("agents.yaml") in done.files
    assert Path("aiam-keys.json") in done.kept  # a key file is never replaced
    assert KeySet.load(folder / "aiam-keys.json").active.kid == before
    assert (folder / ".gitignore").read_text() == "mine\n"
    load(folder).close()
    KeySet.generate("https://someone.else").save(folder / "aiam-keys.json")
    (folder / "agents.yaml").write_text("mine")
    with pytest.raises(ConfigurationError, match=r"belongs to issuer `https://someone\.else`"):
        init_project(folder, force=True)
    assert (folder / "agents.yaml").read_text() == "mine"  # refused before writing anything


def test_init_names_the_agent_and_checks_its_id(tmp_path: Path) -> None:
    init_project(tmp_path / "b", agent_id="billing-bot")
    with load(tmp_path / "b") as project:
        assert [a.id for a in project.registry.list_agents()] == ["billing-bot"]
        token = project.delegate("alice@example.com", "refund", REFUND_CAPS)
        assert token.identity.agent_id == "billing-bot"
        token.end()
    with pytest.raises(ConfigurationError, match="agent id `Billing Bot`"):
        init_project(tmp_path / "c", agent_id="Billing Bot")
    assert not (tmp_path / "c").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="not a folder"):
        init_project(tmp_path / "file")


# --- a user's own registry and policies ------------------------------------------------------

OWN_REGISTRY = """\
version: 1
agents:
  - id: invoice-agent
    name: Invoice agent
    owner: billing@example.com
    policy_set: billing
    tools:
      - name: send_invoice
        action: invoice:send
        consequential: true
        target_arguments: [customer]
        arguments: {customer: String, total: Long}
"""
OWN_POLICY = """\
@id("billing.permit")
permit (principal, action, resource);

@id("billing.large-invoice")
@message("invoices over 10000 need a human")
@approval
forbid (principal, action == Action::"invoice:send", resource)
when { context.args.total > 10000 };
"""


def test_a_users_own_registry_and_policies_load_without_the_demo_policies(
        tmp_path: Path) -> None:
    (tmp_path / "agents.yaml").write_text(OWN_REGISTRY)
    (tmp_path / "rules" / "billing").mkdir(parents=True)
    (tmp_path / "rules" / "billing" / "billing.cedar").write_text(OWN_POLICY)
    KeySet.generate("https://iam.example.com").save(tmp_path / "keys.json")
    (tmp_path / "aiam.yaml").write_text(
        "issuer: https://iam.example.com\naudience: billing\nkeys: keys.json\n"
        "registry: agents.yaml\npolicies: rules\n")
    registry = AgentRegistry.from_yaml(tmp_path / "agents.yaml")
    with pytest.raises(PolicyLoadError):  # the README's old path: the demo's policy sets
        CedarEngine.from_directory(default_policies_dir(), registry)
    with load(tmp_path) as project:
        assert project.config.schema is None and project.recorder is None
        assert project.policy.policy_sets == frozenset({"baseline", "billing"})
        with project.delegate("carol@example.com", "invoice ACME", ["invoice:send total<=50000"],
                              ttl=600) as token:
            small = project.guard.authorize(token, ToolCall(
                "send_invoice", {"customer": "ACME", "total": 500}))
            assert small.outcome == "allow", small.reasons
            large = project.guard.authorize(token, ToolCall(
                "send_invoice", {"customer": "ACME", "total": 20000}))
            assert large.outcome == "approval_required"
            assert large.reasons[0].policy_id == "billing.large-invoice"


# --- broken configurations -------------------------------------------------------------------


def _edit(folder: Path, old: str, new: str) -> None:
    config = folder / "aiam.yaml"
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("old", "new", "message"), [
    ("audience: agentic-iam", "audience: 7", r"field `audience`: must be a non-empty string"),
    ("store: memory", "store: postgres://db", r"field `store`: unknown store `postgres://db`"),
    ("approvers: [you@example.com]", "approvers: you@example.com",
     r"field `approvers`: must be a list"),
    ("  approval_ttl_s: 900", "  approval_ttl_s: '900'",
     r"field `guard.approval_ttl_s`: must be a positive number, got '900'"),
    ("  agent_burst: 400", "  agent_bursts: 400", r"field `guard.agent_bursts`: unknown Guard"),
    ("version: 1", "version: 1\nstorage: memory", r"field `storage`: unknown field"),
    ("version: 1", "version: 2", r"field `version`: must be 1"),
    ("issuer: https://aiam.local", "issuer: https://other.example",
     r"field `issuer`: `https://other.example` does not match the key file's issuer"),
    ("keys: aiam-keys.json", "keys: missing.json",
     r"field `keys`: no key file .*missing.json.*aiam keys generate"),
])
def test_a_broken_config_names_the_file_and_the_field(folder: Path, old: str, new: str,
                                                       message: str) -> None:
    _edit(folder, old, new)
    with pytest.raises(ConfigurationError, match=message) as raised:
        load(folder)
    assert "aiam.yaml" in str(raised.value)


def test_load_reports_missing_and_unparseable_files(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no project configuration .*aiam init"):
        load(tmp_path / "nowhere")
    original = (folder / "aiam.yaml").read_text()
    (folder / "aiam.yaml").write_text("issuer: [unclosed\n")
    with pytest.raises(ConfigurationError, match=r"aiam.yaml: not valid YAML \(line 2\)"):
        load(folder)
    (folder / "aiam.yaml").write_text(original)
    _edit(folder, "registry: agents.yaml", "registry: missing.yaml")
    with pytest.raises(ConfigurationError, match=r"missing\.yaml.*no such registry file"):
        load(folder)
    (folder / "aiam.yaml").write_text("- a list\n")
    with pytest.raises(ConfigurationError, match="must be a YAML mapping"):
        load(folder)


def test_load_reports_a_broken_registry_and_a_policy_that_does_not_validate(
        tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    init_project(first)
    init_project(second)
    (first / "agents.yaml").write_text("version: 1\nagents:\n  - id: x\n    nme: X\n")
    with pytest.raises(ConfigurationError, match=r"agents\.yaml"):
        load(first)
    policy = second / "policies/app/app.cedar"
    policy.write_text(policy.read_text() + "\nforbid (principal, action, resource)\n"
                      "when { context.args.no_such_argument > 1 };\n")
    with pytest.raises(PolicyLoadError, match=r"app\.cedar:\d+"):
        load(second)
    (second / "policies").rename(second / "gone")
    with pytest.raises(PolicyLoadError, match="no such policy directory"):
        load(second)


def test_a_stale_schema_is_refused_until_regenerated(folder: Path) -> None:
    registry = folder / "agents.yaml"
    registry.write_text(registry.read_text().replace(
        "      - name: search_kb\n", "      - name: close_ticket\n        action: ticket:close\n"
        "      - name: search_kb\n"))
    with pytest.raises(PolicyLoadError, match="ticket:close"):
        load(folder)
    result = CliRunner().invoke(app, ["policy", "schema", "--registry", str(registry),
                                      "--out", str(folder / "policies/schema.json")])
    assert result.exit_code == 0, result.output
    load(folder).close()


def test_a_sqlite_store_must_be_initialised_first(folder: Path) -> None:
    _edit(folder, "store: memory", "store: sqlite:state/aiam.db")
    (folder / "state").mkdir()
    with pytest.raises(StoreStateLostError):
        load(folder)
    db = folder / "state" / "aiam.db"
    result = CliRunner().invoke(app, ["store", "init", "--store", f"sqlite:{db}"])
    assert result.exit_code == 0, result.output
    with load(folder) as first:
        token = first.delegate("alice@example.com", "refund", REFUND_CAPS,
                               budget={"tool_calls": 1})
        assert first.guard.authorize(token, refund(30)).outcome == "allow"
    with load(folder) as second:  # another process: the same store, so the same state
        spent = second.guard.authorize(token, refund(30))
        assert spent.outcome == "deny" and spent.reasons[0].code == "budget.exhausted"
        second.guard.end_execution(token.identity)
        with pytest.raises(Exception, match="after close"):
            token.end()  # the Delegation belongs to the (closed) project that minted it
    with load(folder) as third:
        assert third.guard.authorize(token, refund(30)).reasons[0].code == "token.revoked"


def test_a_redis_store_with_its_own_prefix_is_shared_between_processes(folder: Path) -> None:
    import uuid

    import redis

    from tests.conftest import redis_url, require_redis

    require_redis()  # fails in CI without the server, skips locally
    url, prefix = redis_url(), f"aiam-test:{uuid.uuid4().hex}:"
    _edit(folder, "store: memory", f"store: {url}\nstore_prefix: {json.dumps(prefix)}")
    try:
        with pytest.raises(StoreStateLostError,  # no epoch yet: every call would be denied
                           match=f"aiam store init --store {url} --prefix {prefix}"):
            load(folder)
        result = CliRunner().invoke(app, ["store", "init", "--store", url, "--prefix", prefix])
        assert result.exit_code == 0, result.output
        with load(folder) as first, load(folder) as second:
            token = first.delegate("alice@example.com", "refund", REFUND_CAPS,
                                   budget={"tool_calls": 1})
            assert first.guard.authorize(token, refund(30)).outcome == "allow"
            spent = second.guard.authorize(token, refund(30))
            assert spent.reasons[0].code == "budget.exhausted"
            token.end()
            assert second.guard.authorize(token, refund(30)).reasons[0].code == "token.revoked"
    finally:
        client = redis.Redis.from_url(url, socket_timeout=5.0)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_a_store_prefix_without_redis_is_refused(folder: Path) -> None:
    _edit(folder, "store: memory", "store: memory\nstore_prefix: mine")
    with pytest.raises(ConfigurationError, match="field `store_prefix`: only a Redis store"):
        load(folder)


# --- protect ---------------------------------------------------------------------------------


def test_protect_names_what_it_cannot_guard(iam: Project,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"cannot guard a `builtins\.dict`"):
        iam.protect({"not": "an agent"})
    from agents import Agent

    from agentic_iam.integrations import openai_agents

    monkeypatch.delattr(openai_agents, "protect", raising=False)
    with pytest.raises(ConfigurationError, match="openai_agents` adapter has no protect"):
        iam.protect(Agent(name="support"))


# Constructing a LlamaIndex workflow agent touches pydantic's deprecated instance attributes
# (workflows/utils.py `get_steps_from_instance`); the same marks as tests/integrations/llama_index.
@pytest.mark.filterwarnings(
    "ignore:The `__fields(_set)?__` attribute is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings(
    "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance is "
    "deprecated:DeprecationWarning")
def test_protect_dispatches_on_the_framework_of_the_agent(iam: Project,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from agents import Agent
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage
    from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
    from llama_index.core.llms import MockFunctionCallingLLM

    graph = create_agent(model=FakeMessagesListChatModel(responses=[AIMessage("hi")]), tools=[])
    function_agent = FunctionAgent(name="helper", description="helps", tools=[],
                                   llm=MockFunctionCallingLLM())
    workflow = AgentWorkflow(agents=[function_agent])
    sdk_agent = Agent(name="support")
    expected = {id(graph): "langchain", id(function_agent): "llama_index",
                id(workflow): "llama_index", id(sdk_agent): "openai_agents"}
    seen: list[tuple[str, Any, dict[str, Any]]] = []
    for agent in (graph, function_agent, workflow, sdk_agent):
        module = _adapter_module(agent)
        assert module.__name__ == f"agentic_iam.integrations.{expected[id(agent)]}"

        def fake(agent: Any, guard: Any, *, name: str = module.__name__, **kw: Any) -> Any:
            seen.append((name, guard, kw))
            return ("guarded", agent)

        # raising=False: an adapter being rewritten may not have its protect() yet
        monkeypatch.setattr(module, "protect", fake, raising=False)
        assert iam.protect(agent, extra_option=1) == ("guarded", agent)
    assert [s[0].rsplit(".", 1)[1] for s in seen] == [
        "langchain", "llama_index", "llama_index", "openai_agents"]
    for _, guard, kw in seen:
        assert guard is iam.guard
        assert kw == {"broker": iam.broker, "agent_id": "support-agent", "extra_option": 1}
    with pytest.raises(ConfigurationError, match="unknown agent `ghost`"):
        iam.protect(sdk_agent, agent_id="ghost")


def test_project_object_and_public_names(iam: Project) -> None:
    assert iam.store is iam.guard.store and iam.broker.store is iam.store
    assert iam.recorder is iam.guard.recorder is iam.broker.recorder
    assert "support-agent" in repr(iam)
    iam.close()
    iam.close()  # idempotent


# --- the two lines with a real agent loop -----------------------------------------------------


def test_two_line_start_guards_a_langchain_agent(folder: Path) -> None:
    """`load` + `protect` + a `delegate` block around an existing create_agent agent whose
    scripted model asks for an allowed refund, one over the grant and an unregistered tool."""
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    from tests.integrations.langchain.conftest import ai, call, scripted

    ran: list[dict[str, Any]] = []

    @tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount to an account."""
        ran.append({"amount": amount, "currency": currency, "account": account})
        return f"refunded {amount} {currency} to {account}"

    @tool
    def delete_account(account: str) -> str:
        """Delete an account."""
        ran.append({"deleted": account})
        return "deleted"

    model = scripted(ai("Refunding.", call("create_refund", "c1", amount=50, currency="USD",
                                           account="ACC-1001"),
                        call("create_refund", "c2", amount=500, currency="USD",
                             account="ACC-1001"),
                        call("delete_account", "c3", account="ACC-1001")),
                     ai("Done."))
    agent = create_agent(model=model, tools=[create_refund, delete_account])

    with load(folder) as iam:
        agent = iam.protect(agent, agent_id="support-agent")
        with iam.delegate("alice@example.com", "refund T-1042", REFUND_CAPS) as token:
            out = agent.invoke({"messages": [HumanMessage("Refund my double charge.")]})
        assert iam.guard.authorize(token, refund(10)).reasons[0].code == "token.revoked"

    assert ran == [{"amount": 50, "currency": "USD", "account": "ACC-1001"}]
    results = {m.tool_call_id: m for m in out["messages"] if isinstance(m, ToolMessage)}
    assert results["c1"].status == "success"
    assert results["c2"].status == "error" and "amount" in str(results["c2"].content)
    assert results["c3"].status == "error"
    recorded = events(folder)
    decisions = {e["call_id"]: e["decision"]["outcome"] for e in recorded
                 if e["event_type"] == "tool_call.decided" and e["call_id"] in ("c1", "c2", "c3")}
    assert decisions == {"c1": "allow", "c2": "deny", "c3": "deny"}
    assert [e["execution_id"] for e in recorded if e["event_type"] == "execution.ended"] == [
        token.identity.execution_id]


async def test_two_line_start_guards_an_openai_agents_agent(folder: Path) -> None:
    """The same with an existing Agents SDK agent, a tool appended after protect() included."""
    from agents import Agent, Runner, function_tool
    from agents.tracing import set_tracing_disabled

    from tests.integrations.openai_agents.conftest import Scripted, call, say

    set_tracing_disabled(True)  # never export to OpenAI from the tests (as its conftest does)

    ran: list[tuple[str, dict[str, Any]]] = []

    @function_tool
    def create_refund(amount: int, currency: str, account: str) -> str:
        """Refund an amount to an account."""
        ran.append(("create_refund", {"amount": amount, "currency": currency,
                                      "account": account}))
        return f"refunded {amount} {currency} to {account}"

    @function_tool
    def send_email(to: str, subject: str, body: str) -> str:
        """Send an e-mail."""
        ran.append(("send_email", {"to": to}))
        return "sent"

    model = Scripted([call("create_refund", "o1", amount=50, currency="USD", account="ACC-1001"),
                      call("create_refund", "o2", amount=500, currency="USD",
                           account="ACC-1001"),
                      call("send_email", "o3", to="x@evil.test", subject="s", body="b")],
                     [say("Done.")])
    agent = Agent(name="support", model=model, tools=[create_refund])

    with load(folder) as iam:
        agent = iam.protect(agent, agent_id="support-agent")
        agent.tools.append(send_email)  # added after wiring: still guarded
        async with iam.delegate("alice@example.com", "refund T-1042", REFUND_CAPS) as token:
            await Runner.run(agent, "Refund my double charge.")
        assert iam.guard.authorize(token, refund(10)).reasons[0].code == "token.revoked"

    assert ran == [("create_refund", {"amount": 50, "currency": "USD", "account": "ACC-1001"})]
    shown = model.all_outputs()
    assert "refunded 50" in shown["o1"]
    assert "refused" in shown["o2"] and "refused" in shown["o3"]
    recorded = events(folder)
    decisions = {e["call_id"]: e["decision"]["outcome"] for e in recorded
                 if e["event_type"] == "tool_call.decided" and e["call_id"] in ("o1", "o2", "o3")}
    assert decisions == {"o1": "allow", "o2": "deny", "o3": "deny"}
    assert [e["execution_id"] for e in recorded if e["event_type"] == "execution.ended"] == [
        token.identity.execution_id]
