"""A minimal reader of clang's BPF object files (ELF64, little endian).

It extracts what the loader needs and nothing more: each program section's instructions,
the map relocations in it (``R_BPF_64_64`` on a ``ld_imm64`` instruction naming a map
symbol of the ``stockade_maps`` section) and the license string. Anything else that needs
linking (calls into ``.text``, ``.data``/``.rodata`` references, BTF-defined maps) is
refused, so a datapath change that would need a real linker fails loudly at load time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stockade.errors import ApplyError

MAPS_SECTION = "stockade_maps"
LICENSE_SECTION = "license"
PROGRAM_PREFIX = "stockade/"

_SHT_SYMTAB = 2
_SHT_REL = 9
_R_BPF_64_64 = 1
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class MapRelocation:
    insn: int  # index of the ld_imm64 instruction
    map_name: str


@dataclass(frozen=True)
class ProgramSection:
    section: str  # e.g. "stockade/ingress"
    name: str  # the function's symbol, e.g. "stockade_in"
    insns: bytes
    relocations: tuple[MapRelocation, ...]

    @property
    def insn_count(self) -> int:
        return len(self.insns) // 8

    def with_maps(self, fds: dict[str, int]) -> bytes:
        """The instructions with each map reference turned into ``BPF_PSEUDO_MAP_FD`` + fd."""
        code = bytearray(self.insns)
        for rel in self.relocations:
            fd = fds.get(rel.map_name)
            if fd is None:
                raise ApplyError(f"program {self.name} uses map {rel.map_name}, which the loader does not create")
            off = rel.insn * 8
            regs = code[off + 1]
            code[off + 1] = (regs & 0x0F) | (_PSEUDO_MAP_FD << 4)
            struct.pack_into("<i", code, off + 4, fd)
        return bytes(code)


@dataclass(frozen=True)
class BpfObject:
    programs: tuple[ProgramSection, ...]
    license: str
    maps: tuple[str, ...]  # map symbols, in section order

    def program(self, section: str) -> ProgramSection:
        for p in self.programs:
            if p.section == section:
                return p
        raise ApplyError(f"BPF object has no section {section!r}")


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int
    info: int


def read_object(data: bytes) -> BpfObject:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ApplyError("not a 64-bit little-endian ELF object")
    e_machine = struct.unpack_from("<H", data, 18)[0]
    if e_machine != 247:  # EM_BPF
        raise ApplyError(f"ELF machine {e_machine} is not BPF")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = []
    for i in range(shnum):
        name, stype, _flags, _addr, offset, size, link, info = struct.unpack_from(
            "<IIQQQQII", data, shoff + i * shentsize
        )
        raw.append((name, stype, offset, size, link, info))
    strtab_off = raw[shstrndx][2]

    def cstr(base: int, off: int) -> str:
        end = data.index(b"\0", base + off)
        return data[base + off : end].decode()

    sections = [_Section(cstr(strtab_off, r[0]), r[1], r[2], r[3], r[4], r[5]) for r in raw]
    symtab = next((s for s in sections if s.type == _SHT_SYMTAB), None)
    if symtab is None:
        raise ApplyError("BPF object has no symbol table")
    sym_str = sections[symtab.link].offset
    symbols: list[tuple[str, int, int, int]] = []  # name, section index, value, info
    for off in range(symtab.offset, symtab.offset + symtab.size, 24):
        name, info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, off)
        symbols.append((cstr(sym_str, name), shndx, value, info))

    index = {s.name: i for i, s in enumerate(sections)}
    maps_idx = index.get(MAPS_SECTION, -1)
    maps = tuple(
        name for name, shndx, value, _ in sorted(symbols, key=lambda s: s[2]) if shndx == maps_idx and name
    )
    programs: list[ProgramSection] = []
    for i, sec in enumerate(sections):
        if not sec.name.startswith(PROGRAM_PREFIX) or sec.size == 0:
            continue
        funcs = [n for n, shndx, value, info in symbols if shndx == i and value == 0 and (info & 0xF) == 2]
        relocs: list[MapRelocation] = []
        for rel in sections:
            if rel.type != _SHT_REL or rel.info != i:
                continue
            for off in range(rel.offset, rel.offset + rel.size, 16):
                r_offset, r_info = struct.unpack_from("<QQ", data, off)
                sym_name, sym_sec, _, _ = symbols[r_info >> 32]
                if (r_info & 0xFFFFFFFF) != _R_BPF_64_64 or sym_sec != maps_idx:
                    raise ApplyError(
                        f"section {sec.name}: relocation against {sym_name or 'a local symbol'} "
                        "needs a linker this loader does not have"
                    )
                if data[sec.offset + r_offset] != _LD_IMM64:
                    raise ApplyError(f"section {sec.name}: map relocation on a non-ld_imm64 instruction")
                relocs.append(MapRelocation(r_offset // 8, sym_name))
        insns = data[sec.offset : sec.offset + sec.size]
        programs.append(ProgramSection(sec.name, funcs[0] if funcs else sec.name, insns, tuple(relocs)))
    lic = sections[index[LICENSE_SECTION]] if LICENSE_SECTION in index else None
    license = data[lic.offset : lic.offset + lic.size].split(b"\0", 1)[0].decode() if lic else ""
    return BpfObject(tuple(programs), license, maps)
