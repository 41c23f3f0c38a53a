error("this script fails while loading")
