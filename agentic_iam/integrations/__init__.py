"""Framework adapters, one module per framework (``langchain``, ``llama_index``,
``openai_agents``). Each imports its framework at the top and raises
:class:`~agentic_iam.errors.MissingExtraError` naming the extra when it is not installed; this
package itself imports nothing, so ``import agentic_iam`` never pulls in a framework.
"""
