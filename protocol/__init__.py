"""The wire contract both the agent and the server speak. Imports neither of them."""
