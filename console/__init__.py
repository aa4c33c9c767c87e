"""The operator console: a web front on PostgreSQL (reads) and the review service (acts).

It never writes an order itself: it reads the database on a read-only pool and acts only by
publishing review commands (and, later, `order.place`) as its own RabbitMQ user, naming the
operator signed in. README "Console" says how to run it and why it is built as it is."""
