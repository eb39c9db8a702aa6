"""Spend budgets in USD per proxy key, user and team, per UTC day, month and in total.

``model`` holds the budget record, the windows and the ledger row (no database, cheap to
import); ``ledger`` writes spend to the database in batches; ``policy`` reserves a call's
maximum cost before it is forwarded and settles it to the real cost at its end.
"""
