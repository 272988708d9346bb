namespace FineTune.Api.Infrastructure;

/// <summary>Resolves client-given references (file:// URIs or paths) to files confined to configured roots.</summary>
public static class Paths
{
    /// <summary>A full path for <paramref name="reference"/> inside one of <paramref name="roots"/>, or an error.</summary>
    public static (string? Path, string? Error) Confine(string reference, IReadOnlyList<string> roots)
    {
        string candidate;
        if (reference.StartsWith("file://", StringComparison.OrdinalIgnoreCase))
        {
            if (!Uri.TryCreate(reference, UriKind.Absolute, out var uri) || !uri.IsFile || !string.IsNullOrEmpty(uri.Host))
                return (null, "must be a file:///absolute/path URI");
            candidate = uri.LocalPath;
        }
        else if (reference.Contains("://", StringComparison.Ordinal))
            return (null, "only file:// references are supported");
        else if (Path.IsPathRooted(reference)) candidate = reference;
        else
        {
            // Relative: the first root that has it (or the first root, for the error message).
            candidate = roots.Select(r => Path.Combine(r, reference)).FirstOrDefault(p => File.Exists(p) || Directory.Exists(p))
                ?? Path.Combine(roots.FirstOrDefault() ?? ".", reference);
        }
        if (candidate.Contains('\0')) return (null, "is not a valid path");
        var full = Path.GetFullPath(candidate);
        return roots.Any(r => IsUnder(full, r))
            ? (full, null)
            : (null, "is outside the allowed storage roots");
    }

    public static bool IsUnder(string fullPath, string root)
    {
        root = Path.TrimEndingDirectorySeparator(Path.GetFullPath(root));
        return fullPath == root || fullPath.StartsWith(root + Path.DirectorySeparatorChar, StringComparison.Ordinal);
    }
}
