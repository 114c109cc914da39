"""HTTP front end: the starlette app and the OpenAI request/response shapes."""
