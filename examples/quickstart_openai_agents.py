import asyncio
import tempfile

from agents import Agent, ModelResponse, Runner, Usage, function_tool
from agents.models.interface import Model
from agents.tracing import set_tracing_disabled
from openai.types.responses import ResponseFunctionToolCall as FunctionCall
from openai.types.responses import ResponseOutputMessage, ResponseOutputText

import agentic_iam

folder = tempfile.mkdtemp()
agentic_iam.init_project(folder)     # what `aiam init DIR` writes: registry, policies, keys


@function_tool
def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


def refund(amount: int) -> FunctionCall:
    return FunctionCall(type="function_call", call_id=f"c{amount}", name="create_refund",
                        arguments=f'{{"amount": {amount}, "currency": "USD", '
                                  '"account": "ACC-1001"}')


class ScriptedModel(Model):                          # stands in for OpenAIResponsesModel
    def __init__(self):
        self.turns = [[refund(50), refund(500)], [ResponseOutputMessage(
            id="m1", type="message", role="assistant", status="completed", content=[
                ResponseOutputText(type="output_text", annotations=[],
                                   text="Refunded 50 USD; 500 was over my limit.")])]]

    async def get_response(self, *args, **kwargs):
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args, **kwargs):
        raise RuntimeError("not used here")


set_tracing_disabled(True)                            # offline: no trace export
agent = Agent(name="support-agent", model=ScriptedModel(), tools=[create_refund])

iam = agentic_iam.load(folder)
agent = iam.protect(agent, agent_id="support-agent")    # every tool call now passes the Guard

# Alice delegates one task: refunds up to 100; the execution ends with the block.
with iam.delegate("alice@example.com", "refund T-1042", ["refund:create amount<=100"]):
    result = asyncio.run(Runner.run(agent, "Refund 50 USD, then 500 USD, to ACC-1001"))
for item in result.new_items:
    if item.type == "tool_call_output_item":
        print(item.output)
# refunded 50 USD to ACC-1001
# The call to `create_refund` was refused by the access layer and was not run. Reason: ...
