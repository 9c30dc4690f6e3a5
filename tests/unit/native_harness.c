// Feeds gms_whole_body_layout bodies read from stdin, each in a heap block of exactly its
// size, so that AddressSanitizer reports any read outside it. Records: u32 body length,
// u32 boundary length, body, boundary. Prints how many bodies were laid out.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gms_whole_body_layout(const uint8_t*, size_t, const uint8_t*, size_t, size_t, size_t,
                          int64_t*);

int main(void) {
  uint32_t sizes[2];
  long laid_out = 0, total = 0;
  while (fread(sizes, sizeof sizes, 1, stdin) == 1) {
    uint8_t* body = malloc(sizes[0] ? sizes[0] : 1);
    uint8_t* boundary = malloc(sizes[1] ? sizes[1] : 1);
    if (fread(body, 1, sizes[0], stdin) != sizes[0]) return 2;
    if (fread(boundary, 1, sizes[1], stdin) != sizes[1]) return 2;
    int64_t out[24];
    laid_out += gms_whole_body_layout(body, sizes[0], boundary, sizes[1], 16384, 65536, out) > 0;
    ++total;
    free(body);
    free(boundary);
  }
  printf("%ld %ld\n", laid_out, total);
  return 0;
}
