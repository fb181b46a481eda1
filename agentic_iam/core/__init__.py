"""The framework-free core of agentic-iam. It never imports an agent framework."""
