"""Who is asking (issue 23): the API server's users, tokens, roles and workspaces, the identity of a request, and
(`oidc.py`) the tokens of a platform's own identity provider."""
