"""What the proxy tells its operators: logs, usage records, metrics, health and readiness."""
