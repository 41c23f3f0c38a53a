# embed.cmake: turns a Lua source file into a C header with its bytes, so the binary carries
# its own metaparticle module (no install path to get wrong).
#   cmake -DINPUT=metaparticle.lua -DOUTPUT=metaparticle_lua.h -DNAME=mph_metaparticle_lua -P embed.cmake
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" hexlen)
math(EXPR len "${hexlen} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n" bytes "${bytes}")
file(WRITE "${OUTPUT}" "/* Generated from ${INPUT} by embed.cmake; do not edit. */\n"
    "static const unsigned char ${NAME}[] = {\n${bytes}0x00};\n"
    "static const unsigned int ${NAME}_len = ${len};\n")
