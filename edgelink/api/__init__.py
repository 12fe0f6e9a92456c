"""Endpoint handlers, grouped by the API.md section they implement."""
