import asyncio

from llama_index.core.agent.workflow import ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.tools import FunctionTool

from agentic_iam import (AgentRegistry, CedarEngine, DelegationBroker, Guard, Human, KeySet,
                         default_policies_dir, default_registry_path)
from agentic_iam.integrations.llama_index import GuardedFunctionAgent, run_with_identity

registry = AgentRegistry.from_yaml(default_registry_path())
broker = DelegationBroker(registry, KeySet.generate("https://broker.example.com"),
                          audience="my-app")
guard = Guard.from_broker(broker, CedarEngine.from_directory(default_policies_dir(), registry))
token = broker.delegate(Human("alice@example.com"), "support-agent", "refund T-1042",
                        ["refund:create amount<=100"], ttl=900)


def create_refund(amount: int, currency: str, account: str) -> str:
    """Refund an amount to a customer account."""
    return f"refunded {amount} {currency} to {account}"


script = [ChatMessage(role="assistant", blocks=[ToolCallBlock(
    tool_call_id="c1", tool_name="create_refund",
    tool_kwargs={"amount": 500, "currency": "USD", "account": "ACC-1001"})])]
llm = MockFunctionCallingLLM(is_chat_model=True,    # stands in for your function-calling LLM
                             response_generator=lambda messages, **kw: script.pop(0) if script
                             else ChatMessage(role="assistant", content="Done."))
agent = GuardedFunctionAgent(name="support-agent", llm=llm, guard=guard,
                             tools=[FunctionTool.from_defaults(create_refund)])


async def main() -> None:
    handler = await run_with_identity(agent, "Refund 500 USD to ACC-1001", token)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(event.tool_output.content)   # the refusal the model read; the tool never ran
    await handler

asyncio.run(main())
