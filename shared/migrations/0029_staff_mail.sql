-- Staff alert emails go through the mail queue like the clients' mails, but they are about
-- no order's template context: the alert's own context (its title, facts and link) is kept
-- with the mail, and the sender renders `staff_alert` from it.
ALTER TABLE emails ADD COLUMN context jsonb;
