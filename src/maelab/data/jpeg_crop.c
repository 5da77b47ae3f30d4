/* The JPEG crop decoder of data.decode=fast: libjpeg-turbo decodes only the rows and columns of a
   crop (jpeg_skip_scanlines, jpeg_crop_scanline, and no row after the crop's last), at 1/1, 1/2,
   1/4 or 1/8 scale, into RGB. Entropy decoding of the rows above the crop cannot be skipped (a JPEG
   has no row index), but their inverse DCT, upsampling and colour conversion are, and so is all
   of the work below the crop and beside it.

   Built when maelab is installed (hatch_build.py), loaded with ctypes (jpeg_crop.py). The header
   and decode functions return 0, or -1 with libjpeg's message in `message` (JMSG_LENGTH_MAX
   bytes). */

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#if JPEG_LIB_VERSION >= 70
#define H_SCALED(component) (component)->DCT_h_scaled_size
#define V_SCALED(component) (component)->DCT_v_scaled_size
#define MIN_H_SCALED(cinfo) (cinfo)->min_DCT_h_scaled_size
#define MIN_V_SCALED(cinfo) (cinfo)->min_DCT_v_scaled_size
#else
#define H_SCALED(component) (component)->DCT_scaled_size
#define V_SCALED(component) (component)->DCT_scaled_size
#define MIN_H_SCALED(cinfo) (cinfo)->min_DCT_scaled_size
#define MIN_V_SCALED(cinfo) (cinfo)->min_DCT_scaled_size
#endif

#ifndef JPEG_CROP_SOURCE
#define JPEG_CROP_SOURCE "unknown"
#endif

/* The start of this file's SHA-256 as the build hook read it (hatch_build.py): jpeg_crop.py
   compares it with the source beside it, so a library built from an older checkout is not used. */
const char *jpeg_crop_source(void) { return JPEG_CROP_SOURCE; }

typedef struct {
  struct jpeg_error_mgr manager;
  jmp_buf jump;
  char *message;
} Failure;

static void fail(j_common_ptr cinfo) {
  Failure *failure = (Failure *)cinfo->err;
  cinfo->err->format_message(cinfo, failure->message);
  longjmp(failure->jump, 1);
}

/* Warnings (extraneous bytes before a marker, say) are let pass, as PIL lets them; a file that ends
   before the crop does is an error, as it is to PIL and torchvision. */
static void warn(j_common_ptr cinfo, int level) {
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) fail(cinfo);
}

/* The error manager only: each entry point calls setjmp next, then jpeg_create_decompress and
   jpeg_mem_src, which may fail too (an empty file, a library of another version). A jump into the
   frame of a function that has returned is undefined, so setjmp stays in the entry points. */
static void prepare(struct jpeg_decompress_struct *cinfo, Failure *failure, char *message) {
  memset(cinfo, 0, sizeof *cinfo); /* jpeg_destroy_decompress is safe on it before the create */
  cinfo->err = jpeg_std_error(&failure->manager);
  failure->manager.error_exit = fail;
  failure->manager.emit_message = warn;
  failure->message = message;
}

static void open_memory(struct jpeg_decompress_struct *cinfo, const unsigned char *data, unsigned long size) {
  jpeg_create_decompress(cinfo);
  jpeg_mem_src(cinfo, data, size);
}

static unsigned read16(const unsigned char *p, int little) {
  return little ? p[0] | p[1] << 8 : p[0] << 8 | p[1];
}

static unsigned long read32(const unsigned char *p, int little) {
  return little ? read16(p, 1) | (unsigned long)read16(p + 2, 1) << 16
                : (unsigned long)read16(p, 0) << 16 | read16(p + 2, 0);
}

enum { ABSENT = -1, UNSURE = -2 };

/* The Orientation (0x0112) of an EXIF block's first IFD as PIL reads it (9 for any value above 8:
   none that PIL turns by), ABSENT without one, or UNSURE where this reading and PIL's might part
   (a TIFF header, tag type or count PIL reads otherwise, a block cut short): PIL then decides. */
static int exif_orientation(const unsigned char *p, unsigned long size) {
  for (int prefix = 0; prefix < 2 && size >= 6 && memcmp(p, "Exif\0\0", 6) == 0; prefix++)
    p += 6, size -= 6; /* PIL drops one or two */
  int little;
  if (size >= 8 && memcmp(p, "II\x2a\0", 4) == 0)
    little = 1;
  else if (size >= 8 && memcmp(p, "MM\0\x2a", 4) == 0)
    little = 0;
  else
    return UNSURE;
  unsigned long ifd = read32(p + 4, little);
  if (ifd > size - 2) return UNSURE;
  unsigned entries = read16(p + ifd, little);
  for (unsigned long i = 0; i < entries; i++) {
    unsigned long at = ifd + 2 + 12 * i;
    if (at > size || size - at < 12) return UNSURE;
    const unsigned char *entry = p + at;
    if (read16(entry, little) != 0x0112) continue;
    unsigned type = read16(entry + 2, little); /* SHORT (3), or LONG (4) from some writers */
    if (read32(entry + 4, little) != 1 || (type != 3 && type != 4)) return UNSURE;
    unsigned long value = type == 3 ? read16(entry + 8, little) : read32(entry + 8, little);
    return value > 8 ? 9 : (int)value;
  }
  return ABSENT;
}

/* The first digit after `tiff:Orientation="` or `tiff:Orientation>` in an XMP packet, as PIL's
   getexif finds it (a regular expression) when the EXIF block has no Orientation; ABSENT without. */
static int xmp_orientation(const unsigned char *p, unsigned long size) {
  static const char tag[] = "tiff:Orientation";
  const unsigned long length = sizeof tag - 1;
  for (unsigned long i = 0; i + length + 1 < size; i++) {
    if (memcmp(p + i, tag, length) != 0) continue;
    const unsigned char *after = p + i + length;
    unsigned long left = size - i - length;
    if (left >= 3 && after[0] == '=' && after[1] == '"' && after[2] >= '0' && after[2] <= '9') return after[2] - '0';
    if (left >= 2 && after[0] == '>' && after[1] >= '0' && after[1] <= '9') return after[1] - '0';
  }
  return ABSENT;
}

static const char XMP[] = "http://ns.adobe.com/xap/1.0/"; /* and a NUL: an XMP packet's APP1 */

/* header = {height, width, rgb, orientation}: rgb is 1 when the file decodes to RGB here
   (grayscale, YCbCr or RGB; CMYK and YCCK are not), orientation as PIL's getexif reads it: the
   EXIF tag, else the XMP packet's, else 1; UNSURE (-2) where PIL should read it. */
int jpeg_crop_header(const unsigned char *data, unsigned long size, int *header, char *message) {
  struct jpeg_decompress_struct cinfo;
  Failure failure;
  prepare(&cinfo, &failure, message);
  if (setjmp(failure.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  open_memory(&cinfo, data, size);
  jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xffff);
  jpeg_read_header(&cinfo, TRUE);
  header[0] = (int)cinfo.image_height;
  header[1] = (int)cinfo.image_width;
  J_COLOR_SPACE space = cinfo.jpeg_color_space;
  header[2] = space == JCS_GRAYSCALE || space == JCS_YCbCr || space == JCS_RGB;
  /* PIL reads the EXIF block (it joins several: UNSURE here) and the last XMP packet, and the
     XMP's orientation only where the EXIF block has none */
  int exif = ABSENT, exif_blocks = 0, xmp = ABSENT;
  for (jpeg_saved_marker_ptr marker = cinfo.marker_list; marker; marker = marker->next) {
    if (marker->data_length >= 6 && memcmp(marker->data, "Exif\0\0", 6) == 0)
      exif = exif_blocks++ == 0 ? exif_orientation(marker->data, marker->data_length) : UNSURE;
    else if (marker->data_length >= sizeof XMP && memcmp(marker->data, XMP, sizeof XMP) == 0)
      xmp = xmp_orientation(marker->data + sizeof XMP, marker->data_length - sizeof XMP);
  }
  header[3] = exif != ABSENT ? exif : xmp != ABSENT ? xmp : 1;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* Whether jpeg_crop_scanline crops every component right. libjpeg-turbo before 3.0 gives a
   component that is still upsampled after a scaled inverse DCT of another size than the smallest
   (luma sampled 4x2 or 2x4 at 1/2 or 1/4) half its row: such files are decoded at full width. */
static int crops_right(struct jpeg_decompress_struct *cinfo) {
  for (int i = 0; i < cinfo->num_components; i++) {
    jpeg_component_info *c = &cinfo->comp_info[i];
    int upsampled = cinfo->max_h_samp_factor * MIN_H_SCALED(cinfo) != c->h_samp_factor * H_SCALED(c) ||
                    cinfo->max_v_samp_factor * MIN_V_SCALED(cinfo) != c->v_samp_factor * V_SCALED(c);
    if (upsampled && (H_SCALED(c) != MIN_H_SCALED(cinfo) || V_SCALED(c) != MIN_V_SCALED(cinfo))) return 0;
  }
  return 1;
}

/* Rows top..top+height and columns left..left+width of the image decoded at 1/reduction, as RGB
   into out (height * width * 3 bytes). */
int jpeg_crop_decode(const unsigned char *data, unsigned long size, int reduction, int top, int left,
                     int height, int width, unsigned char *out, char *message) {
  struct jpeg_decompress_struct cinfo;
  Failure failure;
  prepare(&cinfo, &failure, message);
  if (setjmp(failure.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  open_memory(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned)reduction;
  jpeg_start_decompress(&cinfo);
  if (top < 0 || left < 0 || height < 1 || width < 1 || (JDIMENSION)(top + height) > cinfo.output_height ||
      (JDIMENSION)(left + width) > cinfo.output_width) {
    snprintf(message, JMSG_LENGTH_MAX, "crop (%d, %d, %d, %d) outside the %ux%u image at 1/%d", top, left,
             height, width, cinfo.output_width, cinfo.output_height, reduction);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  /* Two columns either side: fancy upsampling reads a subsampled chroma column's neighbours, and at
     the edge of the columns it decodes it would repeat the edge instead. libjpeg then moves the
     first column left to an iMCU boundary and widens the row to match. */
  JDIMENSION first = left >= 2 ? (JDIMENSION)left - 2 : 0;
  JDIMENSION end = (JDIMENSION)(left + width) + 2 < cinfo.output_width ? (JDIMENSION)(left + width) + 2
                                                                       : cinfo.output_width;
  JDIMENSION columns = end - first;
  if (crops_right(&cinfo))
    jpeg_crop_scanline(&cinfo, &first, &columns);
  else
    first = 0, columns = cinfo.output_width;
  JSAMPARRAY row = cinfo.mem->alloc_sarray((j_common_ptr)&cinfo, JPOOL_IMAGE, columns * 3, 1);
  if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
  size_t offset = (size_t)(left - (int)first) * 3, length = (size_t)width * 3;
  for (int y = 0; y < height; y++) {
    jpeg_read_scanlines(&cinfo, row, 1);
    memcpy(out + (size_t)y * length, row[0] + offset, length);
  }
  jpeg_abort_decompress(&cinfo); /* the rows below the crop are never decoded */
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
