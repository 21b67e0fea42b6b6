"""Who is asking: the API server's identities (users and tokens, and OIDC tokens of a platform's identity
provider)."""
