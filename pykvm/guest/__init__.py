"""Reading the guest's own state: its code, its page tables, its IDT."""
