import asyncio

from agents import Agent, ModelResponse, Runner, Usage, function_tool
from agents.models.interface import Model
from agents.tracing import set_tracing_disabled
from openai.types.responses import ResponseFunctionToolCall

from agentic_iam import (AgentRegistry, CedarEngine, DelegationBroker, Guard, Human, KeySet,
                         default_policies_dir, default_registry_path)
from agentic_iam.integrations.openai_agents import IAMRunContext, IAMRunHooks, protect

registry = AgentRegistry.from_yaml(default_registry_path())
broker = DelegationBroker(registry, KeySet.generate("https://broker.example.com"),
                          audience="my-app")
guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry))
token = broker.delegate(Human("alice@example.com"), "support-agent", "refund T-1042",
                        ["refund:create amount<=100"], ttl=900)


@function_tool
def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


class ScriptedModel(Model):                          # stands in for OpenAIResponsesModel
    turns = [[ResponseFunctionToolCall(type="function_call", call_id="c1", name="create_refund",
                                       arguments='{"amount": 500, "currency": "USD", '
                                                 '"account": "ACC-1001"}')], []]

    async def get_response(self, *args, **kwargs):
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args, **kwargs):
        raise RuntimeError("not used here")


set_tracing_disabled(True)                            # offline: no trace export
agent = protect(Agent(name="support-agent", model=ScriptedModel(), tools=[create_refund]),
                guard, broker=broker)
result = asyncio.run(Runner.run(agent, "Refund 500 USD to ACC-1001", hooks=IAMRunHooks(guard),
                                context=IAMRunContext(token.token)))
print(result.new_items[-1].output)   # the refusal the model read; the tool never ran
