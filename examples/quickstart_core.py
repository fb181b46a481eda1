from agentic_iam import (AgentRegistry, CedarEngine, DelegationBroker, Guard, Human, KeySet,
                         ToolCall, default_policies_dir, default_registry_path)

registry = AgentRegistry.from_yaml(default_registry_path())    # or your agents.yaml
broker = DelegationBroker(registry, KeySet.generate("https://broker.example.com"),
                          audience="my-app")
guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry))

# Alice delegates one task to the support agent: 15 minutes, refunds up to 100, read tickets.
token = broker.delegate(Human("alice@example.com"), "support-agent", "refund T-1042",
                        ["refund:create amount<=100 currency=USD", "ticket:read"], ttl=15 * 60)

ok = guard.authorize(token, ToolCall("create_refund",
                                     {"amount": 50, "currency": "USD", "account": "ACC-1001"}))
too_much = guard.authorize(token, ToolCall("create_refund",
                                           {"amount": 500, "currency": "USD", "account": "ACC-1"}))
print(ok.outcome)                                  # allow
print(too_much.outcome, too_much.reasons[0].message)
# deny argument `amount` must be <= 100, got 500
