/* Writes a JPEG of the sampling PIL cannot write (test_jpeg_crop.py compiles and runs it):
   jpeg_writer WIDTH HEIGHT LUMA_H LUMA_V OUT, chroma sampled 1 x 1, quality 90, smooth colour
   ramps under a little noise. */
#include <stdio.h>
#include <stdlib.h>

#include <jpeglib.h>

int main(int argc, char **argv) {
  if (argc != 6) return 2;
  int width = atoi(argv[1]), height = atoi(argv[2]);
  struct jpeg_compress_struct cinfo;
  struct jpeg_error_mgr errors;
  cinfo.err = jpeg_std_error(&errors);
  jpeg_create_compress(&cinfo);
  FILE *out = fopen(argv[5], "wb");
  if (!out) return 1;
  jpeg_stdio_dest(&cinfo, out);
  cinfo.image_width = width, cinfo.image_height = height;
  cinfo.input_components = 3, cinfo.in_color_space = JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, 90, TRUE);
  cinfo.comp_info[0].h_samp_factor = atoi(argv[3]), cinfo.comp_info[0].v_samp_factor = atoi(argv[4]);
  for (int c = 1; c < 3; c++) cinfo.comp_info[c].h_samp_factor = cinfo.comp_info[c].v_samp_factor = 1;
  jpeg_start_compress(&cinfo, TRUE);
  unsigned char *row = malloc((size_t)width * 3);
  unsigned noise = 12345;
  for (int y = 0; y < height; y++) {
    for (int x = 0; x < width * 3; x++) {
      noise = noise * 1103515245 + 12345;
      row[x] = (unsigned char)((x * 2 + y * 3 + (x % 3) * 40 + ((noise >> 16) & 31)) & 0xff);
    }
    jpeg_write_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_compress(&cinfo);
  fclose(out);
  free(row);
  return 0;
}
