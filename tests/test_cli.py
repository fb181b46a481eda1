"""The `aiam` command: the mission's example from the CLI, and one clear line on bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agentic_iam.cli import app

runner = CliRunner()


def aiam(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    code, out, _ = aiam("keys", "generate", "--issuer", "https://broker.cli", "--out", str(path))
    assert code == 0, out
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path


def test_mission_example_from_the_cli(keyfile: Path, tmp_path: Path) -> None:
    code, token, err = aiam("delegate", "--keys", str(keyfile), "--agent", "support-agent",
                            "--purpose", "refund T-1042", "--ttl", "15m",
                            "--allow", "refund:create amount<=100", "--allow", "ticket:read")
    assert code == 0, err
    token = token.strip()
    code, out, _ = aiam("token", "inspect", token, "--json")
    claims = json.loads(out)["payload"]
    assert [c["action"] for c in claims["cap"]] == ["refund:create", "ticket:read"]
    assert claims["cap"][0]["constraints"] == {"amount": {"max": 100}}
    assert claims["exp"] - claims["iat"] == 900
    assert claims["delegator"]["sub"] == "alice@example.com"
    code, out, _ = aiam("token", "verify", token, "--keys", str(keyfile))
    assert code == 0 and "valid" in out

    # a narrower sub-delegation, and both hops in the inspected chain
    code, child, err = aiam("subdelegate", "--keys", str(keyfile), "--parent", token,
                            "--agent", "refund-bot", "--allow", "refund:create amount<=20",
                            "--ttl", "5m", "--budget", "tool_calls=3", "--budget", "cost=100")
    assert code == 0, err
    code, out, _ = aiam("token", "inspect", child.strip())
    assert code == 0
    assert "support-agent" in out and "refund-bot" in out and "2 hop(s)" in out


def test_account_delete_is_refused_from_the_cli(keyfile: Path) -> None:
    code, out, err = aiam("delegate", "--keys", str(keyfile), "--agent", "support-agent",
                          "--allow", "account:delete")
    assert code != 0
    assert "account:delete" in err and "agents.support-agent.tools" in err
    assert "Traceback" not in err + out


def test_widening_subdelegation_is_refused_from_the_cli(keyfile: Path) -> None:
    _, token, _ = aiam("delegate", "--keys", str(keyfile), "--agent", "support-agent",
                       "--allow", "refund:create amount<=100")
    code, out, err = aiam("subdelegate", "--keys", str(keyfile), "--parent", token.strip(),
                          "--agent", "refund-bot", "--allow", "refund:create amount<=500")
    assert code != 0 and "amount" in err and "Traceback" not in err + out


def test_verify_fails_with_the_reason(keyfile: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    aiam("keys", "generate", "--issuer", "https://broker.cli", "--out", str(other))
    _, token, _ = aiam("delegate", "--keys", str(other), "--agent", "support-agent",
                       "--allow", "ticket:read")
    code, _, err = aiam("token", "verify", token.strip(), "--keys", str(keyfile))
    assert code == 1 and "UnknownKeyError" in err
    code, _, err = aiam("token", "verify", "garbage", "--keys", str(keyfile))
    assert code == 1 and "MalformedTokenError" in err


def test_agents_list_and_show() -> None:
    code, out, _ = aiam("agents", "list")
    assert code == 0 and "support-agent" in out and "reconcile-agent" in out
    code, out, _ = aiam("agents", "show", "support-agent")
    assert code == 0 and "create_refund" in out and "refund:create" in out


@pytest.mark.parametrize("args", [
    ["agents", "show", "ghost"],
    ["agents", "list", "--registry", "/nonexistent/registry.yaml"],
    ["delegate", "--keys", "/nonexistent/keys.json", "--agent", "support-agent", "--allow", "x:y"],
    ["token", "inspect", "not-a-token"],
    ["audit", "verify", "/nonexistent/audit.jsonl"],
    ["policy", "validate", "/nonexistent/policies"],
])
def test_wrong_input_gives_one_clear_line(args: list[str]) -> None:
    code, out, err = aiam(*args)
    assert code != 0
    assert "Traceback" not in out + err
    assert err.strip(), "an explanation on stderr"
    assert len(err.strip().splitlines()) <= 3


def test_bad_capability_string_gives_one_line(keyfile: Path) -> None:
    code, out, err = aiam("delegate", "--keys", str(keyfile), "--agent", "support-agent",
                          "--allow", "refund:create amount<=lots")
    assert code != 0 and "amount<=lots" in err and "Traceback" not in out + err


def test_unknown_agent_gives_one_line(keyfile: Path) -> None:
    code, _, err = aiam("delegate", "--keys", str(keyfile), "--agent", "ghost",
                        "--allow", "ticket:read")
    assert code != 0 and "ghost" in err


def test_every_help_explains_itself() -> None:
    groups = {"keys": ["generate", "jwks"], "agents": ["list", "show"],
              "token": ["inspect", "verify"], "policy": ["schema", "validate", "test"],
              "approvals": ["list", "approve", "deny"],
              "audit": ["verify", "show", "tree", "export"]}
    code, out, _ = aiam("--help")
    assert code == 0
    for name in [*groups, "delegate", "subdelegate", "revoke", "demo"]:
        assert name in out
    for group, commands in groups.items():
        for command in commands:
            code, out, _ = aiam(group, command, "--help")
            assert code == 0 and len(out.strip()) > 40, (group, command)


def test_policy_commands() -> None:
    code, out, _ = aiam("policy", "validate")
    assert code == 0 and "valid" in out
    code, out, _ = aiam("policy", "test")
    assert code == 0 and "fixtures pass" in out
    code, out, _ = aiam("policy", "schema")
    schema = json.loads(out)
    assert schema, "a schema document"


@pytest.fixture
def pending_refund(tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A refund of 150 waiting for approval in a SQLite store another process can open."""
    from agentic_iam import (
        AgentRegistry,
        CedarEngine,
        DelegationBroker,
        Guard,
        Human,
        JsonlSink,
        KeySet,
        Recorder,
        SqliteStore,
        ToolCall,
    )
    from agentic_iam._resources import default_policies_dir, default_registry_path

    monkeypatch.chdir(tmp_path)  # no aiam-keys.json of the checkout's
    for name in ("AIAM_APPROVER", "AIAM_APPROVERS", "AIAM_AUDIT", "AIAM_KEYS"):
        monkeypatch.delenv(name, raising=False)
    db, audit = tmp_path / "store.db", tmp_path / "audit.jsonl"
    registry = AgentRegistry.from_yaml(default_registry_path())
    recorder = Recorder([JsonlSink(audit)])
    broker = DelegationBroker(registry, KeySet.generate("https://b"), audience="a",
                              store=SqliteStore(db, initialize=True), recorder=recorder)
    guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(),
                                                                 registry))
    token = broker.delegate(Human("alice@example.com"), "support-agent", "refund",
                            ["refund:create amount<=200"], ttl=600)
    call = ToolCall("create_refund", {"amount": 150, "currency": "USD", "account": "ACC-1001"})
    pending = guard.authorize(token, call)
    assert pending.outcome == "approval_required" and pending.approval_id is not None
    yield {"guard": guard, "token": token, "call": call, "id": pending.approval_id,
           "store": f"sqlite:{db}", "audit": audit}
    recorder.close()


def audit_events(path: Path, kind: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e["event_type"] == kind]


def test_approvals_across_processes_via_sqlite(pending_refund: dict[str, Any]) -> None:
    p = pending_refund
    code, out, _ = aiam("approvals", "list", "--store", p["store"])
    assert code == 0
    assert p["id"][:8] in out
    code, out, err = aiam("approvals", "approve", p["id"], "--store", p["store"],
                          "--approver", "bob", "--approvers", "bob,carol",
                          "--audit", str(p["audit"]))
    assert code == 0, err
    assert f"approved {p['id']} as bob" in out
    (granted,) = audit_events(p["audit"], "approval.granted")
    assert granted["extra"] == {"approval_id": p["id"], "approver": "bob"}
    assert granted["agent_id"] == "support-agent"
    assert p["guard"].authorize(p["token"], p["call"]).outcome == "allow"
    assert p["guard"].authorize(p["token"], p["call"]).outcome == "approval_required"


def test_cli_configuration_from_the_environment(pending_refund: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = pending_refund
    monkeypatch.setenv("AIAM_APPROVERS", "carol")
    monkeypatch.setenv("AIAM_APPROVER", "carol")
    monkeypatch.setenv("AIAM_AUDIT", str(p["audit"]))
    code, _, err = aiam("approvals", "deny", p["id"], "--store", p["store"])
    assert code == 0, err
    (denied,) = audit_events(p["audit"], "approval.denied")
    assert denied["extra"] == {"approval_id": p["id"], "approver": "carol"}
    assert p["guard"].authorize(p["token"], p["call"]).outcome == "approval_required"


@pytest.mark.parametrize(("approver", "message", "code"), [
    ("mallory", "approver `mallory` is not a configured approver", "approval.approver_unknown"),
    ("support-agent", "the requesting agent cannot approve its own call",
     "approval.separation_of_duties"),
])
def test_the_cli_refuses_and_records_an_unaccountable_approver(
        pending_refund: dict[str, Any], approver: str, message: str, code: str) -> None:
    p = pending_refund
    exit_code, out, err = aiam("approvals", "approve", p["id"], "--store", p["store"],
                               "--approver", approver, "--approvers", "bob,support-agent",
                               "--audit", str(p["audit"]))
    assert exit_code == 2 and message in err and "Traceback" not in err + out
    (refused,) = audit_events(p["audit"], "approval.denied")
    assert refused["extra"] == {"approval_id": p["id"], "approver": approver,
                                "refused": "approve"}
    assert refused["decision"]["reasons"][0]["code"] == code
    assert audit_events(p["audit"], "approval.granted") == []
    assert p["guard"].authorize(p["token"], p["call"]).outcome == "approval_required"


@pytest.mark.parametrize(("args", "message"), [
    (("--approver", "bob", "--approvers", "bob"), "--audit PATH"),
    (("--approver", "bob", "--audit", "AUDIT"), "no approvers are configured"),
])
def test_the_cli_will_not_answer_off_the_record_or_unconfigured(
        pending_refund: dict[str, Any], args: tuple[str, ...], message: str) -> None:
    p = pending_refund
    args = tuple(str(p["audit"]) if a == "AUDIT" else a for a in args)
    code, _, err = aiam("approvals", "approve", p["id"], "--store", p["store"], *args)
    assert code == 2 and message in err
    assert audit_events(p["audit"], "approval.granted") == []
    assert p["guard"].authorize(p["token"], p["call"]).outcome == "approval_required"


def test_demo_json_runs_offline(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    code, out, err = aiam("demo", "--framework", "core", "--audit", str(audit), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["audit"]["ok"] is True
    outcomes = {(s["tool"], s["arguments"].get("amount")): s["outcome"] for s in report["steps"]}
    assert outcomes[("create_refund", 50)] == "allow"
    assert outcomes[("delete_account", None)] == "deny"
    assert outcomes[("create_refund", 150)] == "allow"     # after the (auto-answered) approval
    assert outcomes[("create_refund", 90)] != "allow"      # injected target
    assert outcomes[("create_refund", 80)] == "deny"       # sub-agent over its narrower grant
    # Issue 13 item 4: without the demo's (ephemeral) key the head's signature cannot be
    # checked, so verify does not say "intact": it says what held and exits 3.
    code, out, _ = aiam("audit", "verify", str(audit))
    assert code == 3 and "verified: the hash chain" in out and "no key" in out


# --- aiam init ------------------------------------------------------------------------------


def test_aiam_init_help() -> None:
    code, out, _ = aiam("init", "--help")
    assert code == 0
    assert "--agent" in out and "--force" in out


def test_aiam_init_prints_what_it_wrote_and_the_next_lines(tmp_path: Path) -> None:
    target = tmp_path / "new"
    code, out, err = aiam("init", str(target), "--agent", "helpdesk")
    assert code == 0, err
    assert "aiam-keys.json" in out and "policies/app/app.cedar" in out
    assert f'iam = agentic_iam.load("{target}")' in out
    assert 'agent = iam.protect(agent, agent_id="helpdesk")' in out
    assert f"cd {target} && aiam policy test" in out
    assert oct((target / "aiam-keys.json").stat().st_mode & 0o777) == "0o600"
    code, out, err = aiam("init", str(target))
    assert code == 2
    # one message (the console folds it at 160 columns, the tmp path is long)
    assert err.startswith("error: ") and "is not empty" in err and "Traceback" not in err
    code, out, err = aiam("init", str(target), "--force")
    assert code == 0 and "aiam-keys.json (kept)" in out, err
    code, out, err = aiam("init", str(tmp_path / "other"), "--agent", "Bad Id")
    assert code == 2 and "agent id `Bad Id`" in err


@pytest.fixture
def project(tmp_path: Path) -> Path:
    from agentic_iam import init_project

    init_project(tmp_path / "proj")
    return tmp_path / "proj"


def test_aiam_policy_test_passes_on_an_initialised_folder(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = aiam("policy", "test", str(project / "policies"))
    assert code == 0, out + err
    assert "10/10 fixtures pass" in out
    monkeypatch.chdir(project)
    code, out, err = aiam("policy", "test")
    assert code == 0, out + err
    assert "10/10 fixtures pass" in out
    assert "support/" not in out  # the project's fixtures, not the demo's
    code, out, _ = aiam("policy", "validate")
    assert code == 0 and "valid: 11 policies" in out


def test_aiam_policy_test_fails_when_a_project_fixture_does_not_hold(project: Path) -> None:
    policy = project / "policies/app/app.cedar"
    policy.write_text(policy.read_text().replace("amount > 100", "amount > 1000"))
    code, out, _ = aiam("policy", "test", str(project / "policies"))
    assert code == 1
    assert "FAIL" in out and "refund-150.json" in out
