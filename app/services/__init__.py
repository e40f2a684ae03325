"""Services: the decisions and transactions behind each route, job and command."""
