"""Who is asking (issue 23): the API server's users, tokens, roles and workspaces, and the identity of a request.
`oidc.py` (beside this package's modules) verifies a platform's OIDC tokens."""
