return { value = "from sibling" }
