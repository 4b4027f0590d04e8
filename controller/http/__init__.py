"""The OpenAI-compatible HTTP API, served by the controller process on a port of its own.

Every request takes the path a gRPC Submit takes (Controller.submit: validation,
admission, durable in Redis before it is acknowledged) and reads its tokens through the
one stream reader (service/token_stream.py). Authentication is auth.Authenticator, with
the same tokens and roles as gRPC.

  app.py            the FastAPI app and the server in the controller's event loop
  routes.py         the endpoints
  schemas.py        request bodies (pydantic), OpenAI field names
  chat_template.py  chat messages -> prompt token ids
  stop.py           stop strings over streamed text
  sse.py            server-sent events and the response objects
  errors.py         domain errors -> HTTP status and the OpenAI error body
"""
