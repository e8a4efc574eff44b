"""Framework glue: each adapter translates the request, calls the Guard, renders the result."""
