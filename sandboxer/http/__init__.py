"""The HTTP surface: routes as data, the API handlers, auth, the parser's errors in
JSON, the dashboard and its static files."""
