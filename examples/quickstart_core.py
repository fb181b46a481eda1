import tempfile

import agentic_iam
from agentic_iam import ToolCall

folder = tempfile.mkdtemp()
agentic_iam.init_project(folder)     # what `aiam init DIR` writes: registry, policies, keys
iam = agentic_iam.load(folder)


def create_refund(amount: int, currency: str, account: str) -> str:
    return f"refunded {amount} {currency} to {account}"


# Alice delegates one task to the support agent: 15 minutes, refunds up to 100, read tickets.
with iam.delegate("alice@example.com", "refund T-1042",
                  ["refund:create amount<=100 currency=USD", "ticket:read"]) as token:
    for amount in (50, 500):
        call = ToolCall("create_refund", {"amount": amount, "currency": "USD",
                                          "account": "ACC-1001"})
        result = iam.guard.mediate(token, call, lambda args: create_refund(**args))
        print(result.status, result.value or result.refusal)
# ran refunded 50 USD to ACC-1001
# refused ... argument `amount` must be <= 100, got 500
