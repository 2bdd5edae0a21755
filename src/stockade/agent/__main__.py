"""``python -m stockade.agent``: the agent command without the rest of the CLI (faster start)."""

from stockade.agent.main import agent

agent(prog_name="stockade agent")
