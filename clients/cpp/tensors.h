// Raw tensor contents of the Open Inference Protocol: little-endian, row-major; a BYTES element
// is a 4-byte little-endian length followed by that many bytes. One std::string per tensor, the
// entry that goes into raw_input_contents (or comes back in raw_output_contents).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace headrace {

namespace detail {

template <std::size_t Size>
struct UnsignedOfSize;
template <>
struct UnsignedOfSize<1> { using type = std::uint8_t; };
template <>
struct UnsignedOfSize<2> { using type = std::uint16_t; };
template <>
struct UnsignedOfSize<4> { using type = std::uint32_t; };
template <>
struct UnsignedOfSize<8> { using type = std::uint64_t; };

// Byte by byte, so the wire order is little-endian whatever the host's order.
template <typename T>
void StoreLittleEndian(T value, char* out) {
  using Bits = typename UnsignedOfSize<sizeof(T)>::type;
  const auto bits = std::bit_cast<Bits>(value);
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    out[i] = static_cast<char>(static_cast<unsigned char>(bits >> (8 * i)));
  }
}

template <typename T>
T LoadLittleEndian(const char* in) {
  using Bits = typename UnsignedOfSize<sizeof(T)>::type;
  Bits bits = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    bits |= static_cast<Bits>(static_cast<Bits>(static_cast<unsigned char>(in[i])) << (8 * i));
  }
  return std::bit_cast<T>(bits);
}

}  // namespace detail

constexpr std::size_t kLengthPrefixBytes = 4;

// Fixed-size datatypes: T is the element type (float for FP32, std::int64_t for INT64, ...).
template <typename T>
std::string PackRaw(const std::vector<T>& values) {
  static_assert(std::is_arithmetic_v<T>, "fixed-size datatypes only; BYTES has PackBytes");
  std::string packed(values.size() * sizeof(T), '\0');
  for (std::size_t i = 0; i < values.size(); ++i) {
    detail::StoreLittleEndian(values[i], packed.data() + i * sizeof(T));
  }
  return packed;
}

// Throws std::invalid_argument when the length is not a whole number of elements.
template <typename T>
std::vector<T> UnpackRaw(std::string_view raw) {
  static_assert(std::is_arithmetic_v<T>, "fixed-size datatypes only; BYTES has UnpackBytes");
  if (raw.size() % sizeof(T) != 0) {
    throw std::invalid_argument("raw contents: " + std::to_string(raw.size()) +
                                " bytes is not a multiple of " + std::to_string(sizeof(T)));
  }
  std::vector<T> values(raw.size() / sizeof(T));
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] = detail::LoadLittleEndian<T>(raw.data() + i * sizeof(T));
  }
  return values;
}

inline std::string PackBytes(const std::vector<std::string>& elements) {
  std::string packed;
  for (const auto& element : elements) {
    char prefix[kLengthPrefixBytes];
    detail::StoreLittleEndian(static_cast<std::uint32_t>(element.size()), prefix);
    packed.append(prefix, kLengthPrefixBytes);
    packed.append(element);
  }
  return packed;
}

// Throws std::invalid_argument on a truncated prefix or an element that overruns the contents.
inline std::vector<std::string> UnpackBytes(std::string_view raw) {
  std::vector<std::string> elements;
  std::size_t at = 0;
  while (at < raw.size()) {
    if (raw.size() - at < kLengthPrefixBytes) {
      throw std::invalid_argument("BYTES contents: truncated length prefix at byte " +
                                  std::to_string(at));
    }
    const auto length = detail::LoadLittleEndian<std::uint32_t>(raw.data() + at);
    at += kLengthPrefixBytes;
    if (raw.size() - at < length) {
      throw std::invalid_argument("BYTES contents: element of " + std::to_string(length) +
                                  " bytes overruns the contents at byte " + std::to_string(at));
    }
    elements.emplace_back(raw.substr(at, length));
    at += length;
  }
  return elements;
}

}  // namespace headrace
