"""The FastAPI reference peer: edgelink's benchmarked endpoints written the usual way.

FastAPI with pydantic models and a token dependency, served by uvicorn with its standard
extras (httptools, uvloop). It reads the same settings as edgelink (``edgelink.config``)
so both servers are started with the same environment. Run it with
``python -m bench.reference --port P``.
"""
