from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool

from agentic_iam import (AgentRegistry, CedarEngine, DelegationBroker, Guard, Human, KeySet,
                         default_policies_dir, default_registry_path)
from agentic_iam.integrations.langchain import GuardMiddleware, IAMContext

registry = AgentRegistry.from_yaml(default_registry_path())
broker = DelegationBroker(registry, KeySet.generate("https://broker.example.com"),
                          audience="my-app")
guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry))
token = broker.delegate(Human("alice@example.com"), "support-agent", "refund T-1042",
                        ["refund:create amount<=100"], ttl=900)


@tool
def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


class ScriptedModel(FakeMessagesListChatModel):    # stands in for your chat model
    def bind_tools(self, tools, **kwargs):
        return self


model = ScriptedModel(responses=[
    AIMessage("", tool_calls=[{"name": "create_refund", "id": "c1", "args": {
        "amount": 500, "currency": "USD", "account": "ACC-1001"}}]),
    AIMessage("I can only refund up to 100 USD without more authority."),
])
agent = create_agent(model, tools=[create_refund], middleware=[GuardMiddleware(guard)],
                     context_schema=IAMContext)
result = agent.invoke({"messages": [("user", "Refund 500 USD to ACC-1001")]},
                      context=IAMContext(token.token))      # the token stays out of the state
print(result["messages"][2].content)   # the refusal the model read; the tool never ran
