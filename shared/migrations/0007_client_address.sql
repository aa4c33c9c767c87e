-- Clients' billing address, all optional (a fraud provider may be sent it); the phone
-- number is kept as the client gave it.
ALTER TABLE clients ADD COLUMN address1 text;
ALTER TABLE clients ADD COLUMN address2 text;
ALTER TABLE clients ADD COLUMN city text;
ALTER TABLE clients ADD COLUMN state text;
ALTER TABLE clients ADD COLUMN postcode text;
ALTER TABLE clients ADD COLUMN phone text;
