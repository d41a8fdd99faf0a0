"""Protocol adapters: thin translations between wire formats and ``kiln.server.core`` types."""
