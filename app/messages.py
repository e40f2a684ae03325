"""User-facing texts whose exact wording the frontend relies on."""

SESSION_RESET = "Your session has been reset due to a technical issue. Please start again."
GENERAL_ERROR = (
    "The system has encountered an error, which has been notified to the administrator "
    "to investigate. Please try again later."
)
