"""Customer email: order confirmation, invoice and welcome mails over SMTP."""
