import tempfile

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

import agentic_iam

folder = tempfile.mkdtemp()
agentic_iam.init_project(folder)     # what `aiam init DIR` writes: registry, policies, keys


@tool
def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


class ScriptedModel(FakeMessagesListChatModel):    # stands in for your chat model
    def bind_tools(self, tools, **kwargs):
        return self


model = ScriptedModel(responses=[
    AIMessage("", tool_calls=[{"name": "create_refund", "id": f"c{amount}", "args": {
        "amount": amount, "currency": "USD", "account": "ACC-1001"}}]) for amount in (50, 500)
] + [AIMessage("Refunded 50 USD; 500 was over my limit.")])
agent = create_agent(model, tools=[create_refund])

iam = agentic_iam.load(folder)
agent = iam.protect(agent, agent_id="support-agent")    # every tool call now passes the Guard

# Alice delegates one task: refunds up to 100; the execution ends with the block.
with iam.delegate("alice@example.com", "refund T-1042", ["refund:create amount<=100"]):
    result = agent.invoke({"messages": [("user", "Refund 50 USD, then 500 USD, to ACC-1001")]})
for message in result["messages"]:
    if isinstance(message, ToolMessage):
        print(message.content)
# refunded 50 USD to ACC-1001
# The call to `create_refund` was refused by the access layer and was not run. Reason: ...
