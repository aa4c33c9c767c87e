"""The console's pages, one module per page family; each exports `routes`."""
