"""Who the caller is (passwords, JWTs, API keys) and what they may do."""
