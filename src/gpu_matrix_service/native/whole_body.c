// The layout of a small two-file upload that arrived whole, found in one call (ctypes).
//
// gms_whole_body_layout reads a multipart/form-data body the way uploads.read_whole_body and
// zip_records.decode_in_one_piece read it, for the one layout clients send: exactly two file
// parts whose header blocks are a plain Content-Disposition with a file name and maybe a
// Content-Type, each holding a bare .npy or a stored one-member .npz (numpy.savez). It only
// finds where things are; the caller checks the CRC-32, reads the .npy header's dictionary
// and copies the data. Like the Python readers it only succeeds or declines: anything else,
// and anything wrong, returns 0 and the Python readers read the body and word the error, so
// every answer is theirs. It reads nothing outside body[0, len) and writes only out[0, GMS_LAYOUT_INTS).

#define _GNU_SOURCE  // memmem
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define GMS_API __attribute__((visibility("default")))
#define GMS_PARTS 2
// Per part, offsets into the body: name, file name, content type as [start, end) (-1 -1 when
// absent); where the .npy file starts, its header's dictionary text starts, the text ends and
// the array data starts, and the file ends; the stored member's CRC-32 of the whole .npy file
// (-1 for a bare .npy); 1 when the header text is UTF-8 (.npy 3.0), else 0 (latin-1).
#define GMS_PART_INTS 12
#define GMS_LAYOUT_INTS (GMS_PARTS * GMS_PART_INTS)

static const char kDisposition[] = "Content-Disposition: form-data; name=\"";
static const char kFilename[] = "; filename=\"";
static const char kContentType[] = "\r\nContent-Type: ";
static const uint8_t kNpyMagic[] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
static const uint8_t kLocalHeader[] = {'P', 'K', 3, 4};
enum { kLocalHeaderBytes = 30, kStored = 0, kDeclinedFlags = 0x1 | 0x8 };
static const uint32_t kZip64Marker = 0xFFFFFFFFu;

GMS_API int gms_whole_body_abi(void) { return 2; }

static int starts_with(const uint8_t* p, size_t n, const void* prefix, size_t m) {
  return n >= m && memcmp(p, prefix, m) == 0;
}

static uint16_t u16(const uint8_t* p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint32_t u32(const uint8_t* p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64(const uint8_t* p) { return (uint64_t)u32(p) | (uint64_t)u32(p + 4) << 32; }

// bytes.find(needle, start, end): the first offset in [start, end - m] where needle begins.
static int64_t find(const uint8_t* body, size_t start, size_t end, const void* needle, size_t m) {
  if (end < start || end - start < m) return -1;
  const void* hit = memmem(body + start, end - start, needle, m);
  return hit == NULL ? -1 : (int64_t)((const uint8_t*)hit - body);
}

// A quoted value of PLAIN_PART_HEADERS ([^"\\\r\n]*"): its end (the closing quote), or -1.
static int64_t quoted(const uint8_t* block, size_t at, size_t end) {
  for (size_t i = at; i < end; ++i) {
    const uint8_t c = block[i];
    if (c == '"') return (int64_t)i;
    if (c == '\\' || c == '\r' || c == '\n') return -1;
  }
  return -1;
}

static int is_space(uint8_t c) {  // \s of a bytes regex
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// multipart_splitter.PLAIN_PART_HEADERS, fully matched on body[start, end), with a file name
// required: name, file name and content type spans (-1, -1 when absent) into part[0..5].
static int plain_file_headers(const uint8_t* body, size_t start, size_t end, int64_t* part) {
  size_t at = start;
  const size_t n = sizeof kDisposition - 1;
  if (!starts_with(body + at, end - at, kDisposition, n)) return 0;
  at += n;
  int64_t close = quoted(body, at, end);
  if (close < 0) return 0;
  part[0] = (int64_t)at, part[1] = close;
  at = (size_t)close + 1;
  const size_t f = sizeof kFilename - 1;
  if (!starts_with(body + at, end - at, kFilename, f)) return 0;  // no file name: not ours
  at += f;
  close = quoted(body, at, end);
  if (close < 0) return 0;
  part[2] = (int64_t)at, part[3] = close;
  at = (size_t)close + 1;
  part[4] = part[5] = -1;
  if (at == end) return 1;
  const size_t t = sizeof kContentType - 1;
  if (!starts_with(body + at, end - at, kContentType, t)) return 0;
  at += t;
  if (at == end) return 0;  // \S+: at least one
  for (size_t i = at; i < end; ++i) {
    if (is_space(body[i])) return 0;
  }
  part[4] = (int64_t)at, part[5] = (int64_t)end;
  return 1;
}

// zip_records._only_member for a stored member: its span into file[0..1], its CRC-32 into
// part[10].
static int stored_member(const uint8_t* body, size_t start, size_t end, int64_t* part,
                         size_t* file) {
  const size_t len = end - start;
  if (len < kLocalHeaderBytes) return 0;
  const uint8_t* h = body + start;
  const uint16_t flags = u16(h + 6), method = u16(h + 8);
  const uint32_t crc = u32(h + 14);
  uint64_t packed = u32(h + 18), size = u32(h + 22);
  const size_t name_len = u16(h + 26), extra_len = u16(h + 28);
  const size_t data = kLocalHeaderBytes + name_len + extra_len;
  if ((flags & kDeclinedFlags) || method != kStored || len < data) return 0;
  if (name_len > 0 && h[kLocalHeaderBytes + name_len - 1] == '/') return 0;  // a directory
  if (packed == kZip64Marker || size == kZip64Marker) {
    // Only numpy's zip64 extra: one record (tag 1, length 16) with both sizes.
    const uint8_t* extra = h + kLocalHeaderBytes + name_len;
    if (packed != kZip64Marker || size != kZip64Marker || extra_len != 20) return 0;
    if (u16(extra) != 1 || u16(extra + 2) != 16) return 0;
    size = u64(extra + 4), packed = u64(extra + 12);
  }
  if (packed != size || packed > len - data) return 0;
  const size_t member_end = data + (size_t)packed, rest = len - member_end;
  if (rest > 0) {  // the archive's trailer must follow: another member is the stream's
    static const uint8_t kTrailers[4][4] = {
        {'P', 'K', 1, 2}, {'P', 'K', 6, 6}, {'P', 'K', 6, 7}, {'P', 'K', 5, 6}};
    if (rest < kLocalHeaderBytes) return 0;
    int trailer = 0;
    for (int i = 0; i < 4; ++i) trailer |= memcmp(h + member_end, kTrailers[i], 4) == 0;
    if (!trailer) return 0;
  }
  file[0] = start + data, file[1] = start + member_end;
  part[10] = crc;
  return 1;
}

// arrays.parse_npy_header's framing of the .npy file body[file[0], file[1]) into part[6..9]
// and part[11].
static int npy_header(const uint8_t* body, const size_t* file, size_t most_header_bytes,
                      int64_t* part) {
  const uint8_t* npy = body + file[0];
  const size_t len = file[1] - file[0];
  if (len < 10 || memcmp(npy, kNpyMagic, sizeof kNpyMagic) != 0) return 0;
  size_t header_len, text;
  if (npy[6] == 1) {
    header_len = u16(npy + 8), text = 10;
  } else if (npy[6] == 2 || npy[6] == 3) {
    if (len < 12) return 0;
    header_len = u32(npy + 8), text = 12;
  } else {
    return 0;
  }
  if (header_len > most_header_bytes || header_len > len - text) return 0;
  part[6] = (int64_t)file[0];
  part[7] = (int64_t)(file[0] + text);
  part[8] = (int64_t)(file[0] + text + header_len);
  part[9] = (int64_t)file[1];
  part[11] = npy[6] == 3;
  return 1;
}

// The .npy file of a part's content (a bare .npy, or a stored .npz's only member), framed.
static int npy_file(const uint8_t* body, size_t start, size_t end, size_t most_header_bytes,
                    int64_t* part) {
  size_t file[2] = {start, end};
  part[10] = -1;
  if (starts_with(body + start, end - start, kLocalHeader, sizeof kLocalHeader) &&
      !stored_member(body, start, end, part, file)) {
    return 0;
  }
  return npy_header(body, file, most_header_bytes, part);
}

// Fills out[GMS_LAYOUT_INTS] (GMS_PART_INTS per part, as above) and returns GMS_PARTS, or
// returns 0 to decline. A part's header block is looked for in its first max_header_bytes;
// a .npy header of more than most_npy_header_bytes is declined.
GMS_API int gms_whole_body_layout(const uint8_t* body, size_t len, const uint8_t* boundary,
                                  size_t boundary_len, size_t max_header_bytes,
                                  size_t most_npy_header_bytes, int64_t* out) {
  if (boundary_len == 0 || boundary_len > 200) return 0;
  // "--" boundary CRLF opens the body; "\r\n--" boundary ends each part.
  uint8_t delimiter[204];
  delimiter[0] = '\r', delimiter[1] = '\n', delimiter[2] = '-', delimiter[3] = '-';
  memcpy(delimiter + 4, boundary, boundary_len);
  const size_t delimiter_len = boundary_len + 4;
  if (len < delimiter_len || memcmp(body, delimiter + 2, delimiter_len - 2) != 0) return 0;
  size_t position = delimiter_len - 2;
  if (len - position < 2 || body[position] != '\r' || body[position + 1] != '\n') return 0;
  position += 2;
  for (int i = 0; i < GMS_PARTS; ++i) {
    int64_t* part = out + i * GMS_PART_INTS;
    const size_t window = position + max_header_bytes < len ? position + max_header_bytes : len;
    const int64_t headers_end = find(body, position, window, "\r\n\r\n", 4);
    if (headers_end < 0) return 0;
    const int64_t content_end =
        find(body, (size_t)headers_end + 4, len, delimiter, delimiter_len);
    if (content_end < 0) return 0;
    if (!plain_file_headers(body, position, (size_t)headers_end, part)) return 0;
    if (!npy_file(body, (size_t)headers_end + 4, (size_t)content_end, most_npy_header_bytes,
                  part)) {
      return 0;
    }
    position = (size_t)content_end + delimiter_len;
    if (len - position < 2) return 0;
    const int last = i == GMS_PARTS - 1;
    // After the first part a CRLF starts the second; after the second "--" closes the body
    // (an epilogue after it is ignored, as the splitter ignores it).
    if (memcmp(body + position, last ? "--" : "\r\n", 2) != 0) return 0;
    position += 2;
  }
  return GMS_PARTS;
}
