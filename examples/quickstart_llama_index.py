import asyncio
import tempfile

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool

import agentic_iam

folder = tempfile.mkdtemp()
agentic_iam.init_project(folder)     # what `aiam init DIR` writes: registry, policies, keys


def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


script = [ChatMessage(role="assistant", blocks=[ToolCallBlock(
    tool_call_id=f"c{amount}", tool_name="create_refund",
    tool_kwargs={"amount": amount, "currency": "USD", "account": "ACC-1001"})])
    for amount in (50, 500)]
llm = MockFunctionCallingLLM(is_chat_model=True,    # stands in for your function-calling LLM
                             response_generator=lambda messages, **kw: script.pop(0) if script
                             else ChatMessage(role="assistant", content="Done."))
agent = FunctionAgent(name="support", llm=llm, tools=[FunctionTool.from_defaults(create_refund)])

iam = agentic_iam.load(folder)
agent = iam.protect(agent, agent_id="support-agent")    # every tool call now passes the Guard


async def main() -> None:
    # Alice delegates one task: refunds up to 100; the run ends the execution when it finishes.
    with iam.delegate("alice@example.com", "refund T-1042", ["refund:create amount<=100"]):
        handler = agent.run(user_msg="Refund 50 USD, then 500 USD, to ACC-1001")
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                print(event.tool_output.content)
        await handler

asyncio.run(main())
# refunded 50 USD to ACC-1001
# The call to `create_refund` was refused by the access layer and was not run. Reason: ...
